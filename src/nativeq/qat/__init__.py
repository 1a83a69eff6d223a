"""nativeq.qat"""
