"""Export a compressed model as a Hugging Face directory that reloads anywhere (DESIGN.md §12).

| module | what lives there |
|---|---|
| `writer` | `export_compressed`: write the directory into a staging folder, prove it, move it into place; `check_export_target`, `check_export_storage` |
| `format` | the directory's format: the `rankscope_compression` config section, weights, the checksum manifest, `load_compressed` |
| `modeling` | the bundled `modeling_rankscope.py` that `trust_remote_code` loads |
| `report` | side-by-side generation and its tokens/s timing, the export report and its model card |

The public names are re-exported here: `from engine.export import export_compressed, load_compressed`.
"""

from engine.export.format import ExportError, load_compressed
from engine.export.report import (ExportReport, generate_and_time, generate_side_by_side, measure_generation_speed,
                                  measure_generation_speeds)
from engine.export.writer import check_export_storage, check_export_target, export_compressed

__all__ = ["export_compressed", "check_export_target", "check_export_storage", "load_compressed", "ExportError", "ExportReport", "generate_side_by_side",
           "generate_and_time", "measure_generation_speed", "measure_generation_speeds"]
