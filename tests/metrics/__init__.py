"""Tests of apqa.metrics."""
