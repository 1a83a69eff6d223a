"""nativeq.runtime"""
