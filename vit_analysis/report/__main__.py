"""`python -m vit_analysis.report --workdir=DIR [--compare=DIR2] [--out=FILE]`."""
from vit_analysis.report import page

page.main()
