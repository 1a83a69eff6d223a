"""nativeq.export"""
