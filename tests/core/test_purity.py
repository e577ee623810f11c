"""sae_core is pure torch: importing it (and everything in it) loads no Ray, MLflow or transformers."""

from __future__ import annotations

import subprocess
import sys


def test_import_sae_core_loads_no_distributed_or_model_stack():
    code = (
        "import sys, pkgutil, importlib, sae_core\n"
        "sae_core.names()\n"
        "for m in pkgutil.walk_packages(sae_core.__path__, 'sae_core.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted({n.split('.')[0] for n in sys.modules} & {'ray', 'mlflow', 'transformers', 'workflows'})\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"sae_core pulled in: {result.stdout.strip()}"
