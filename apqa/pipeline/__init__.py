"""The embedded alert-production pipeline: single-visit processing, differencing, DIA."""
