"""Locality-aware placement (pure): types, snapshot building, estimators and policies."""
