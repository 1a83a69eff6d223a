"""nativeq.models"""
