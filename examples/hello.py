import platform, sys
print(f"Hello from Python {platform.python_version()} inside a TVM microVM (kernel {platform.release()})")
