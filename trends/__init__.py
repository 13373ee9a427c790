"""Trend maths, the trend-detecting handler, trend tables and analyst queries."""
