"""Relative L2 gap between the layer-wise engine's no-op walk and the model's own forward (last block outputs),
plus md5s of the calibration/eval windows and the dense perplexity of the first 4 eval windows (issue 12).
The tree may be another checkout (e.g. the code before the per-block arguments fix):
    PYTHONPATH=<tree> python bench/walk_gap.py <tree> <hf checkpoint dir> <seqlen> [nwindows]"""
import sys, time
tree, ckpt, seqlen = sys.argv[1], sys.argv[2], int(sys.argv[3])
n = int(sys.argv[4]) if len(sys.argv) > 4 else 4
sys.path.insert(0, tree + "/tests")
import torch
torch.set_num_threads(1)
import elsa
from transformers import AutoModelForCausalLM, AutoTokenizer
from elsa.data.corpora import EmbeddedCorpus, token_stream, windows, sample_starts
from elsa.engines.layerwise import LayerwiseEngine
from elsa.sparsity.patterns import Sparsity
from test_layerwise import NoOp, last_block_outputs
print("elsa from", elsa.__file__, flush=True)
tok = AutoTokenizer.from_pretrained(ckpt)
model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
train = token_stream(tok, EmbeddedCorpus("wiki", "wiki"), "train")
ids = windows(train, seqlen, tok.bos_token_id, sample_starts(len(train), n, seqlen, 0))
t = time.time()
engine = LayerwiseEngine(model, "cpu", batch_size=2)
engine.run(NoOp(batch_size=2), ids, Sparsity(0.5), keep_outputs=True)
got = torch.cat(engine.outputs)
with torch.no_grad():
    want = torch.cat([last_block_outputs(model, ids[i:i + 2]) for i in range(0, n, 2)])
rel = float((got - want).norm() / want.norm())
import hashlib
from elsa.data.corpora import eval_windows
from elsa.eval.perplexity import perplexity
test = token_stream(tok, EmbeddedCorpus("wiki", "wiki"), "test")
full = eval_windows(test, seqlen, tok.bos_token_id, 65536)
first = full[:4]
h = lambda t: hashlib.md5(t.numpy().tobytes()).hexdigest()[:12]
print(f"windows: calib md5 {h(ids)}, eval (65536-token protocol, {len(full)} windows) md5 {h(full)}; "
      f"dense ppl on the first 4 eval windows {perplexity(model, first, 4):.6f}", flush=True)
print(f"seqlen={seqlen} windows={n} attn={model.config._attn_implementation} rel_l2={rel:.6f} "
      f"max_abs={float((got - want).abs().max()):.4g} ({time.time() - t:.0f}s)", flush=True)
