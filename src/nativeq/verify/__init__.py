"""nativeq.verify"""
