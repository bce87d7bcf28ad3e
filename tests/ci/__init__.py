"""Tests of apqa.ci."""
