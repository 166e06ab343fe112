"""A section of benchmarks/RESULTS.md that its own command writes (between two HTML comments) and that
benchmarks/run.py, which rewrites the rest of the file, keeps."""
from __future__ import annotations


def with_section(results_md: str, section: str, start: str, end: str) -> str:
    """RESULTS.md with the section between `start` and `end` replaced (or added at the end)."""
    if start in results_md and end in results_md:
        before, rest = results_md.split(start, 1)
        return before + section + rest.split(end, 1)[1]
    return (results_md.rstrip("\n") + "\n\n" if results_md.strip() else "") + section + "\n"
