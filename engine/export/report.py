"""What an export reports: generation side by side, measured tokens/s, the report object and model card.

`generate_side_by_side` runs one prompt through the original and the compressed model (greedy, so
the texts are comparable); `generate_and_time` does the same and times it, with more timed runs if
asked; `measure_generation_speeds` (`measure_generation_speed` for one model) only times.
`ExportReport` gathers sizes, parameter counts, quality, speed and the self-check results;
`render_model_card` turns it into the README.md written with the export.

Tokens/s is the batch-1 greedy decoding speed: 1 / the median time between consecutive generated
tokens (each interval is one decode step: a forward pass of one token with the KV cache, and the
greedy pick), over the runs of each model. The first generated token, whose time includes the
prompt's prefill and any one-off cost of a first call, starts the count and is not itself counted,
so no warm-up run is needed, and an export times its side-by-side generation itself: by default
(one run) tokens/s costs no generation beyond the side-by-side one. Each run's whole `generate`
time is kept too (`seconds`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional

import torch

from engine.models.device import input_device

DEFAULT_PROMPT = "The quick brown fox"
DEFAULT_NEW_TOKENS = 32
DEFAULT_TIMING_RUNS = 1  # timed generations per model at export: the side-by-side one, and runs - 1 more
DEFAULT_CHECK_WINDOWS = 1  # evaluation windows whose logits an export compares after each reload


@dataclass(frozen=True)
class SideBySide:
    """The continuation of one prompt by the original and by the compressed model (greedy)."""

    prompt: str
    original: str
    compressed: str
    new_tokens: int
    matching_tokens: int  # leading generated tokens on which both models agree


@dataclass(frozen=True)
class GenerationSpeed:
    """Batch-1 greedy decoding speed: 1 / median seconds per decode step, over `runs` generations of `new_tokens`.

    `decode_steps` intervals were timed (`runs * (new_tokens - 1)`); with one new token there are none, and
    tokens/s is then `new_tokens / median(seconds)`."""

    tokens_per_second: float
    new_tokens: int
    runs: int
    seconds: list[float]  # each run's whole generate call (prefill and first token included)
    threads: int
    decode_steps: int = 0
    median_step_s: Optional[float] = None


class _TokenClock:
    """A `generate` streamer that notes when each token arrives: the prompt first, then each generated token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def decode_steps(self) -> list[float]:
        """Seconds between consecutive generated tokens (`times[1]` is the first one, after the prompt's prefill)."""
        generated = self.times[1:]
        return [later - earlier for earlier, later in zip(generated, generated[1:])]


def _prompt_ids(tokenizer, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = tokenizer(prompt, return_tensors="pt")  # adds BOS where the tokenizer wants it (Gemma)
    return encoded["input_ids"], encoded["attention_mask"]


@torch.no_grad()
def _generate(model, tokenizer, prompt: str, max_new_tokens: int, clock: Optional[_TokenClock] = None) -> torch.Tensor:
    """Exactly `max_new_tokens` greedy tokens after the prompt: `[max_new_tokens]` ids (timed by `clock`, if any)."""
    ids, mask = _prompt_ids(tokenizer, prompt)
    ids, mask = ids.to(input_device(model)), mask.to(input_device(model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                         streamer=clock)
    return out[0, ids.shape[1]:]  # [new]


@dataclass
class _Timing:
    """One model's timed runs so far."""

    seconds: list[float] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)

    def run(self, model, tokenizer, prompt: str, max_new_tokens: int) -> torch.Tensor:
        clock = _TokenClock()
        start = time.perf_counter()
        generated = _generate(model, tokenizer, prompt, max_new_tokens, clock)
        self.seconds.append(time.perf_counter() - start)
        self.steps += clock.decode_steps()
        return generated

    def speed(self, max_new_tokens: int) -> GenerationSpeed:
        seconds = [round(s, 5) for s in self.seconds]
        threads = torch.get_num_threads()
        if not self.steps:  # one new token: nothing but the first token to time
            return GenerationSpeed(max_new_tokens / statistics.median(self.seconds), max_new_tokens, len(seconds),
                                   seconds, threads)
        step = statistics.median(self.steps)
        return GenerationSpeed(1 / step, max_new_tokens, len(seconds), seconds, threads, len(self.steps), round(step, 6))


def _time_runs(models: Mapping[str, object], timings: Mapping[str, _Timing], tokenizer, prompt: str,
               max_new_tokens: int, runs: range) -> None:
    """Timed generations of every model for each run number, in order for even runs and reversed for odd ones
    (A B, B A, ...), so a change of the machine's load during the measurement falls on both models alike."""
    labels = list(models)
    for run in runs:
        for label in (labels if run % 2 == 0 else labels[::-1]):
            timings[label].run(models[label], tokenizer, prompt, max_new_tokens)


def _side_by_side(first: torch.Tensor, second: torch.Tensor, tokenizer, prompt: str) -> SideBySide:
    n = min(len(first), len(second))
    differs = (first[:n] != second[:n]).nonzero()
    matching = int(differs[0, 0]) if len(differs) else n
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    return SideBySide(prompt, decode(first), decode(second), n, matching)


def generate_side_by_side(original_model, compressed_model, tokenizer, prompt: str = DEFAULT_PROMPT,
                          max_new_tokens: int = DEFAULT_NEW_TOKENS) -> SideBySide:
    """Greedy continuations of `prompt` by both models, decoded, with the length of their common start."""
    first = _generate(original_model, tokenizer, prompt, max_new_tokens)
    second = _generate(compressed_model, tokenizer, prompt, max_new_tokens)
    return _side_by_side(first, second, tokenizer, prompt)


def generate_and_time(original_model, compressed_model, tokenizer, prompt: str = DEFAULT_PROMPT,
                      max_new_tokens: int = DEFAULT_NEW_TOKENS, runs: int = DEFAULT_TIMING_RUNS
                      ) -> tuple[SideBySide, dict[str, GenerationSpeed]]:
    """`generate_side_by_side`, timed: its two generations are each model's first timed run, and `runs - 1` more
    timed generations per model follow, interleaved. Returns the side-by-side texts and
    `{"original": GenerationSpeed, "compressed": GenerationSpeed}`."""
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    models = {"original": original_model, "compressed": compressed_model}
    timings = {label: _Timing() for label in models}
    generated = {label: timings[label].run(model, tokenizer, prompt, max_new_tokens) for label, model in models.items()}
    _time_runs(models, timings, tokenizer, prompt, max_new_tokens, range(1, runs))
    return (_side_by_side(generated["original"], generated["compressed"], tokenizer, prompt),
            {label: timing.speed(max_new_tokens) for label, timing in timings.items()})


def measure_generation_speed(model, tokenizer, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = DEFAULT_NEW_TOKENS,
                             runs: int = 3) -> GenerationSpeed:
    """Tokens/s of batch-1 greedy generation of exactly `max_new_tokens` tokens (see the module docstring), over
    `runs` timed generations."""
    return measure_generation_speeds({"model": model}, tokenizer, prompt, max_new_tokens, runs)["model"]


def measure_generation_speeds(models: Mapping[str, object], tokenizer, prompt: str = DEFAULT_PROMPT,
                              max_new_tokens: int = DEFAULT_NEW_TOKENS, runs: int = 3) -> dict[str, GenerationSpeed]:
    """`measure_generation_speed` of each model, their runs interleaved (A B, B A, ...)."""
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    timings = {label: _Timing() for label in models}
    _time_runs(models, timings, tokenizer, prompt, max_new_tokens, range(runs))
    return {label: timing.speed(max_new_tokens) for label, timing in timings.items()}


@dataclass(frozen=True)
class Check:
    """One self-check of an export: what was compared, whether it passed, and the numbers."""

    name: str
    passed: bool
    detail: str


@dataclass
class ExportReport:
    """Everything `export_compressed` measured and wrote; `to_dict()` is the CLI's `--json` output."""

    out_dir: str
    storage: str  # "low-rank" or "dense"
    method: str
    model_id: str
    files: dict[str, int]  # file name -> bytes
    weights_bytes: int
    original_weights_bytes: Optional[int]
    parameters: dict  # plan counts + reloaded counts, see export._parameter_report
    # {"original", "compressed", "reloaded"}: perplexity, kl_forward, kl_reverse, tokens; "compressed" is the plan's
    # record for these windows (checked against the reload) or, when the plan has none, measured in memory
    quality: dict
    evaluation: dict  # text and windowing of the quality numbers
    logits_max_abs_diff: dict[str, float]  # reload path -> max |logits - in-memory logits|
    speed: dict[str, GenerationSpeed]  # "original", "compressed"
    generation: SideBySide
    checks: list[Check] = field(default_factory=list)
    # a plan that prunes MLP channels: {"settings": {aggregation, retention}, "of_mlps": n,
    # "mlps": {mlp path: {"layer", "kept", "channels"}}}; None when nothing is pruned
    pruning: Optional[dict] = None
    # where quality["compressed"] comes from: "plan" (the plan's metrics for these evaluation windows, which the
    # reload's re-evaluation agreed with) or "in-memory" (measured on the compressed model before writing)
    compressed_quality_from: str = "in-memory"
    # whether quality["reloaded"] was measured on the reloaded model (every evaluation window), or is the plan's record,
    # reported once the reload was proven to hold the written tensors bit for bit and to give identical logits
    reload_evaluated: bool = True
    # seconds spent in each part of the export (see engine.export.writer.TIMING_PARTS) and "total_s"
    timings: dict[str, float] = field(default_factory=dict)
    # where and in which forward dtype the quality numbers and the logits checks were measured
    measured_on: dict = field(default_factory=lambda: {"device": "cpu", "dtype": "float32"})

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def _fmt_bytes(n: Optional[int]) -> str:
    return "unknown" if n is None else f"{n / 2**20:,.2f} MiB ({n:,} bytes)"


def _pruning_lines(pruning: Optional[dict]) -> list[str]:
    """The model card's section on MLPs pruned by channels (LoRAP): the settings and each MLP's kept width."""
    if not pruning:
        return []
    settings, mlps = pruning.get("settings") or {}, pruning["mlps"]
    kept, total = sum(m["kept"] for m in mlps.values()), sum(m["channels"] for m in mlps.values())
    lines = [
        "## Pruned MLPs", "",
        f"{len(mlps)} of {pruning['of_mlps']} MLPs are pruned by channels (LoRAP: gate and up keep the kept rows, down "
        f"the kept columns; channels scored by the {settings.get('aggregation', 'l2')} aggregation of |W|·‖X‖, "
        f"retaining the least important {settings.get('retention', 0) * 100:g}%). They keep {kept:,} of {total:,} "
        "intermediate channels, and are stored as smaller dense linears (config.json's `rankscope_compression.pruned` "
        "lists each with its size), so the model also computes less per token.", "",
        "| layer | MLP | kept channels | of |", "|---:|---|---:|---:|",
    ]
    lines += [f"| {m['layer']} | `{path}` | {m['kept']:,} | {m['channels']:,} |" for path, m in mlps.items()]
    return lines + [""]


def render_model_card(report: ExportReport) -> str:
    """The README.md model card of an export (Markdown with a small YAML header)."""
    p, q = report.parameters, report.quality
    dec, tot = p["decoder_linear"], p["total"]
    dense = report.storage == "dense"
    lines = [
        "---", "library_name: transformers",
        f"tags: [rankscope, low-rank, compressed{', pruned' if report.pruning else ''}]", "---", "",
        f"# {report.model_id}, compressed with {report.method} (RankScope)", "",
    ]
    if dense:
        lines += ["> **Dense export: NOT smaller.** The low-rank product `W_r = B_r A_r` of every compressed linear is",
                  "> stored as a plain `nn.Linear` weight, so this model has the original's size and speed (plus any",
                  "> bias the method added). It exists for tools that need standard layers.", ""]
    lines += [
        "## Load it", "",
        "```python",
        "from engine.export import load_compressed  # RankScope, no remote code",
        "model, tokenizer, plan = load_compressed(directory)",
        "",
        "from transformers import AutoModelForCausalLM  # plain transformers",
        f"model = AutoModelForCausalLM.from_pretrained(directory{'' if dense else ', trust_remote_code=True'})",
        "```", "",
    ]
    if not dense:
        pruned_too = " and the smaller linears of the pruned MLPs" if report.pruning else ""
        lines += [f"`trust_remote_code=True` runs the bundled `modeling_rankscope.py`, which swaps in the low-rank "
                  f"linears{pruned_too} before the weights load. Without it transformers builds the dense architecture and "
                  "reports the factor tensors as unexpected and the dense weights as missing.", ""]
    lines += [
        "## Parameters", "",
        "| | dense | compressed | removed |", "|---|---:|---:|---:|",
        f"| decoder linears | {dec['dense']:,} | {dec['compressed']:,} | {dec['reduction']:.2%} |",
        f"| whole model (embeddings included, tied ones once) | {tot['dense']:,} | {tot['compressed']:,} | {tot['reduction']:.2%} |",
        "",
        f"Parameters after reloading this directory: {p['reloaded']:,} = the plan's {'dense' if dense else 'compressed'} "
        f"count {p['expected_from_plan']:,} + {p['added_bias']:,} bias parameters on linears that had no bias "
        f"({'the method adds them' if not dense else 'added by the method, or zero where a config switch adds them'})"
        + (f" - {p['removed_bias']:,} bias parameters of pruned channels" if p.get("removed_bias") else "") + ".", "",
        *_pruning_lines(report.pruning),
        "## File size", "",
        f"- `model.safetensors`: {_fmt_bytes(report.weights_bytes)}",
        f"- the original's weights: {_fmt_bytes(report.original_weights_bytes)}", "",
        "## Quality", "",
        f"On {report.evaluation['text']} ({report.evaluation['n_windows']} windows of {report.evaluation['window_len']} tokens, "
        f"{q['compressed']['tokens']:,} predicted tokens; forward passes in {report.measured_on['dtype']} on "
        f"{report.measured_on['device']}).", "",
        "| model | perplexity | KL(P_orig‖P_comp) | KL(P_comp‖P_orig) |", "|---|---:|---:|---:|",
    ]
    if report.compressed_quality_from != "plan":
        compressed_label = "compressed (in memory)"
    elif report.reload_evaluated:
        compressed_label = "compressed (the plan's record; the reload re-measured it)"
    else:
        compressed_label = "compressed (the plan's record for these windows)"
    reloaded_label = ("reloaded from this directory" if report.reload_evaluated else
                      "reloaded from this directory (its tensors are the written ones bit for bit: the plan's record)")
    for label, key in (("original", "original"), (compressed_label, "compressed"), (reloaded_label, "reloaded")):
        m = q[key]
        lines.append(f"| {label} | {m['perplexity']:.4f} | {m['kl_forward']:.6f} | {m['kl_reverse']:.6f} |")
    s_orig, s_comp = report.speed["original"], report.speed["compressed"]
    g = report.generation
    lines += [
        "", "KL is per predicted token in nats, exact over the full vocabulary.", "",
        "## Generation speed", "",
        f"Batch 1, greedy decoding: 1 / the median time between consecutive generated tokens, over "
        f"{s_comp.runs} generation(s) of {s_comp.new_tokens} tokens per model (the first, the side-by-side one below; "
        f"the first token of each, which includes the prompt's prefill, is not counted), {s_comp.threads} CPU "
        "thread(s), measured at export time on the exporting machine.", "",
        "| model | tokens/s |", "|---|---:|",
        f"| original | {s_orig.tokens_per_second:.1f} |",
        f"| compressed (this directory) | {s_comp.tokens_per_second:.1f} |", "",
        "## Same prompt, both models (greedy)", "",
        f"Prompt: `{g.prompt}`", "",
        f"- original: {g.original!r}",
        f"- compressed: {g.compressed!r}",
        f"- the first {g.matching_tokens} of {g.new_tokens} generated tokens are identical", "",
        "## Self-check at export", "",
        "| check | result | detail |", "|---|---|---|",
    ]
    lines += [f"| {c.name} | {'passed' if c.passed else 'FAILED'} | {c.detail} |" for c in report.checks]
    pruned = " and every pruned linear with its size" if report.pruning else ""
    lines += ["", "The rank plan (with its metrics and their definitions) is in `rank_plan.json`; the compression "
              f"section of `config.json` lists every compressed linear with its rank{pruned}.", ""]
    return "\n".join(lines)
