"""Test gates for what older torch versions lack (README "Versions" lists what was run)."""

import pytest
import torch

# Where torch.compile fails on a product, hvp="compiled" runs eagerly with one warning (tested
# on every torch); these tests need it to compile. It does on torch 2.13, not on 2.8 and before:
# dynamo cannot trace the torch.func transforms (2.1, 2.4), breaks the graph under MSE and
# EmbeddingBag (2.5 to 2.8), inductor fails on the Transformer (2.6, 2.8) or miscompiles (2.6,
# caught by the eager check). 2.9 to 2.12 are not run.
compiled_products = pytest.mark.skipif(
    torch.__version__ < "2.9", reason="torch.compile fails on some products before torch 2.9"
)
