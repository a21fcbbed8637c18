"""`engine report`: a self-contained static HTML page of retrieval results, with plots.

Modules: `inputs` reads and checks the caller's files, `curves` computes precision-recall,
`thumbs` makes cached thumbnails, `plots` draws PNGs, `html` renders the page from plain data,
`build` ties them together (`write_report`). The command, `engine report`, is in engine/cli/report.py.
"""
from .build import write_report

__all__ = ["write_report"]
