"""nativeq.compile"""
