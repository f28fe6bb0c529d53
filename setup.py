"""Build of the optional C decoders (compeft_format._native); everything else is in pyproject.toml.

The extension is optional: when it cannot be built, the package installs without it and decodes
with torch operations.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "compeft_format._native",
            ["compeft_format/_native.c"],
            extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra"],
            optional=True,
        )
    ]
)
