"""jaxcomp: make large language models small and keep them good (JAX/Flax).

The public API: load a model, compose pure transforms over its param pytree, evaluate, save.
"""

from jaxcomp import data, parallel, train
from jaxcomp.calib import Calibration, collect_input_stats
from jaxcomp.checkpoint import load_checkpoint, save_checkpoint
from jaxcomp.core import CompressedLeaf, Rule, chain, dense, get_transform, tree_size
from jaxcomp.errors import JaxcompError
from jaxcomp.eval import perplexity
from jaxcomp.models import build_model
from jaxcomp.models.generate import generate
from jaxcomp.models.hf import export_hf
from jaxcomp.models.loading import load_model
from jaxcomp.quant import (
    QArray,
    fake_quantize,
    int2,
    int3,
    int4,
    int8,
    int_format,
    minifloat,
    nf,
    nf4,
    quantize,
)
from jaxcomp.quant.actquant import ActQuant
from jaxcomp.quant.awq_transform import awq, smoothquant
from jaxcomp.quant.clipping_transform import learn_clip
from jaxcomp.quant.gptq_transform import gptq
from jaxcomp.quant.qat import QATArray
from jaxcomp.quant.rotation_transform import act_quant, rotate
from jaxcomp.tensornet import KronMatrix, LowRank, TTMatrix
from jaxcomp.tensornet import asvd_transform as asvd
from jaxcomp.tensornet import kron_transform as kron
from jaxcomp.tensornet import svd_transform as svd
from jaxcomp.tensornet import tt_transform as tt
from jaxcomp.train import HealConfig, MeshConfig, heal

__version__ = "0.1.0"

__all__ = ["ActQuant", "Calibration", "CompressedLeaf", "HealConfig", "JaxcompError", "KronMatrix",
           "LowRank", "MeshConfig", "QATArray", "QArray", "Rule", "TTMatrix", "act_quant", "asvd",
           "awq", "build_model", "chain", "collect_input_stats", "data", "dense", "export_hf",
           "fake_quantize", "generate", "get_transform", "gptq", "heal", "int2", "int3", "int4",
           "int8", "int_format", "kron", "learn_clip", "load_checkpoint", "load_model",
           "minifloat", "nf", "nf4", "parallel", "perplexity", "quantize", "rotate",
           "save_checkpoint", "smoothquant", "svd", "train", "tree_size", "tt"]
