# Only here for the optional C extension (pyproject.toml holds the metadata).
# optional=True: without a C compiler the install still succeeds and activator
# falls back to os.posix_spawn / os.fork (see activator/spawn.py).
from setuptools import Extension, setup

setup(ext_modules=[
    Extension("activator._fastspawn", ["activator/_fastspawn.c"], optional=True),
    # The proxy's data path (activator/proxy.py falls back to its own relay without it).
    Extension("activator._relay", ["activator/_relay.c"], optional=True),
])
