"""Model & texts: which model is loaded, what it is made of, and how well it predicts text."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from app.progress import progress_bar
from app.resources import default_model_reference, get_model, get_store
from engine.errors import RankScopeError, describe_error
from engine.models.registry import REGISTRY
from engine.models.summary import parameter_summary
from engine.texts.corpus import BUILTIN_BOOKS, DEFAULT_EVALUATION_TEXT
from engine.texts.windows import Windowing
from engine.cache_keys import find_baseline_evaluation
from engine.workspace import ensure_baseline_evaluation

st.title("RankScope")
st.caption("Where does a language model's redundancy live? Start by choosing the model and the texts.")

with st.sidebar:
    st.header("Model")
    default = default_model_reference()
    options = list(dict.fromkeys([default, *REGISTRY]))
    choice = st.selectbox("Registry model", options, index=0, key="model_choice")
    custom = st.text_input("...or a model directory, .gguf file or hub id", key="model_custom").strip()
    reference = custom or choice
    st.header("Evaluation text")
    eval_text = st.selectbox("Built-in text", list(BUILTIN_BOOKS), index=list(BUILTIN_BOOKS).index(DEFAULT_EVALUATION_TEXT))
    eval_file = st.text_input("...or a .txt/.jsonl/.parquet path", key="eval_file").strip()
    window_len = st.number_input("Window length (tokens)", min_value=16, max_value=4096, value=512, step=16)
    n_windows = st.number_input("Windows", min_value=1, max_value=1024, value=16, step=1)

text_source = eval_file or eval_text
try:
    loaded = get_model(reference)
except RankScopeError as exc:
    st.error(f"Could not load '{reference}'. {exc}")
    st.stop()
except Exception as exc:  # noqa: BLE001 - any loader failure is shown, not dumped
    st.error(f"Could not load '{reference}': {describe_error(exc)}")
    st.stop()

summary = parameter_summary(loaded)
st.subheader(f"{reference}")
cols = st.columns(5)
cols[0].metric("Architecture", summary.model_type)
cols[1].metric("Layers", summary.num_layers)
cols[2].metric("Parameters", f"{summary.total / 1e6:.1f} M")
cols[3].metric("Decoder linears", f"{summary.decoder_linear / 1e6:.1f} M")
cols[4].metric("Embedding share", f"{summary.embedding_share:.1%}")
st.write(
    f"Hidden size {summary.hidden_size}, intermediate size {summary.intermediate_size}, "
    f"{summary.num_attention_heads} query / {summary.num_key_value_heads} key-value heads, "
    f"vocabulary {summary.vocab_size:,}, embeddings {'tied' if summary.tied_embeddings else 'untied'}."
)

rows = pd.DataFrame(summary.rows())
left, right = st.columns([3, 2])
with left:
    figure = px.bar(rows, x="group", y="parameters", text=rows["share"].map(lambda s: f"{s:.1%}"))
    figure.update_layout(height=340, margin=dict(t=10, b=10), yaxis_title="parameters")
    st.plotly_chart(figure, width="stretch")
    st.caption(
        "Parameters by group, summed over layers. Low-rank compression acts on the seven decoder linear types; "
        "on a small model the embedding is a large share that it cannot touch, so compression is reported "
        "over decoder linears and over the whole model."
    )
with right:
    st.dataframe(
        rows.assign(share=rows["share"].map(lambda s: f"{s:.2%}")), hide_index=True, width="stretch"
    )

st.subheader("Original model quality")
windowing = Windowing(int(window_len), int(n_windows))
store = get_store()
try:
    record = find_baseline_evaluation(store, loaded.fingerprint, text_source, windowing)
    if record is None:
        record = ensure_baseline_evaluation(
            store, loaded, text_source, windowing, progress_bar("Evaluating the original model...")
        )
except RankScopeError as exc:
    st.error(f"Could not evaluate on '{text_source}'. {exc}")
    st.stop()
quality = st.columns(3)
quality[0].metric("Perplexity", f"{record.perplexity:.3f}")
quality[1].metric("Predicted tokens", f"{record.n_tokens:,}")
quality[2].metric("Evaluation time", f"{record.seconds:.1f} s")
st.caption(
    f"Perplexity = exp(mean next-token negative log-likelihood) over {record.n_windows} windows of "
    f"{record.window_len} tokens from the start of '{text_source}'"
    f"{' (each window starts with BOS)' if record.add_bos else ''}. Cached: reopening this page is instant."
)
