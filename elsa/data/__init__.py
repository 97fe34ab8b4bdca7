"""Corpora, token streams and calibration windows."""
