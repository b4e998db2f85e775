"""The page, rebuilt from a run's saved results alone (no JAX): `python -m vit_analysis.report`.

`load_results`, `rebuild`, `render_page`, `write_report` (report/page.py) are the public names.
"""
from vit_analysis.report.page import (
                                      as_result,
                                      load_results,
                                      main,
                                      rebuild,
                                      render_page,
                                      render_report,
                                      write_report,
)

__all__ = ["as_result", "load_results", "main", "rebuild", "render_page", "render_report",
           "write_report"]
