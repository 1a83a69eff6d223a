"""nativeq.tuning"""
