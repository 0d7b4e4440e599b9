"""The shipped demo model (models/shipped/shuttle-moe-tiny): Shuttle's greedy tokens equal transformers'.

8 English prompts × 64 new tokens, shapes (A, E, M) = (1,1,1) and (2,3,2), on a real local Ray
deployment. Skipped, with the reason, while no shipped checkpoint is committed.
"""

import pytest

from models.embedded import SHIPPED_DIR, shipped_model_dir

pytestmark = pytest.mark.skipif(shipped_model_dir() is None, reason=(
    f"no shipped checkpoint at {SHIPPED_DIR} yet: train it with train/train_moe.py (see train/README.md)"))

PROMPTS = ["Return the", "This module provides", "The \"while\" statement is used", "If the file does not exist,",
           "Create a new", "An exception is raised when", "The default value of", "Convert a string to"]
NEW_TOKENS = 64
SHAPES = [(1, 1, 1), (2, 3, 2)]


@pytest.fixture(scope="module")
def prompt_ids():
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(f"{SHIPPED_DIR}/tokenizer.json")
    return [tok.encode(p).ids for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(prompt_ids):
    from tiny_models import hf_generate
    return hf_generate(SHIPPED_DIR, prompt_ids, NEW_TOKENS)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "A%dE%dM%d" % s)
def test_shipped_model_matches_hugging_face(ray_session, prompt_ids, reference, shape):
    import torch

    from cluster.deployment import Deployment
    from scheduler.config import EngineConfig
    from scheduler.engine import Engine
    from scheduler.request import SamplingParams
    a, e, m = shape
    config = EngineConfig(attention_ranks=a, expert_ranks=e, micro_batches=m, max_batch_tokens=48)
    dep = Deployment.start(SHIPPED_DIR, config)
    try:
        engine = Engine(config, dep.limits, dep, return_logits=True)
        out = engine.generate(prompt_ids, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    finally:
        dep.shutdown()
    ref_tokens, ref_logits = reference
    for i, (c, tokens, logits) in enumerate(zip(out, ref_tokens, ref_logits)):
        assert c.token_ids == tokens, f"prompt {i} ({PROMPTS[i]!r}): tokens differ from transformers"
        diff = (torch.tensor(c.logits) - logits).abs().max().item()
        assert diff <= 1e-3, f"prompt {i}: logits differ by {diff:.2e}"
