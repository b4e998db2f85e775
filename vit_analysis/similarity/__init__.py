"""Comparing representations: CKA maths, the other measures, sides of a comparison, the runner."""
