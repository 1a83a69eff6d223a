"""Relax passes of nativeq's compile pipeline, one pass per file."""
