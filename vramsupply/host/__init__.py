"""What this machine lets the process use: CPU time and memory, as a container or a systemd unit limits them.

A container sees the whole host in ``/proc/meminfo``, in sysfs and (unless it was pinned) in its
affinity mask; only its cgroups say what it may really use. Threads or caches sized from the
host's numbers get a container throttled (``cgroups.py``: threads spending a CPU quota at the
graph's barriers) or killed by the kernel (``memory.py``: a prompt cache, or layers kept on the
CPU, that fit the host but not the container). The engine and the memory plan both read here.
"""
