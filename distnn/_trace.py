import os, time, atexit
_on = os.path.isdir("/tmp/trace")
_buf = []
def mark(what, step):
    if not _on:
        return
    _buf.append(f"{what} {step} {time.time_ns()}\n")
    if len(_buf) >= 200:
        flush()
def flush():
    if _buf:
        with open(f"/tmp/trace/{os.getpid()}.txt", "a") as f:
            f.writelines(_buf)
        _buf.clear()
atexit.register(flush)
