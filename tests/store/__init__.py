"""Tests of apqa.store."""
