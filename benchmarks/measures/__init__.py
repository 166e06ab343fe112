"""The measures, in the order they run (the data measure reads measure 1's model consumption, measure 2's profile
reads the data measure's loader time, measures 3 and 4 share their demo runs). Each module has `TITLE`,
`run(ctx) -> section` and `markdown(section) -> str`; the report lists them by their number."""
from benchmarks.measures import data_pipeline, fused_rows, gpu, overhead, phase2_vs_naive, stage_reuse, throughput

MEASURES = {
    "throughput": throughput,
    "data": data_pipeline,
    "phase2": phase2_vs_naive,
    "overhead": overhead,
    "stage_reuse": stage_reuse,
    "gpu": gpu,
    "fused": fused_rows,
}
REPORT_ORDER = ("throughput", "phase2", "overhead", "stage_reuse", "data", "gpu", "fused")
