"""What only a GPU run confirms about the kernels (issue 13): skipped without CUDA.

Run by ``benchmarks/gpu_check.sh`` with the real compiler, not the interpreter that
``tests/conftest.py`` selects by default:

    TRITON_INTERPRET=0 python -m pytest -q tests/test_cuda.py

Each test checks what ``samplers/kernels/README.md`` promises ("What is promised on a GPU")
or a defect the CPU interpreter hides (it runs programs one after another in IEEE numpy
math and compiles nothing): shared-memory limits, GPU math against the thresholds, the
GPU's prefix-sum order in the draw, launches on a second GPU, CUDA graph capture.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import samplers.functional as F  # noqa: E402
from samplers import SamplerPipeline, SamplingBatch, SamplingParams  # noqa: E402
from samplers.sampling import draw_tokens as ref_draw, row_uniforms, split_seed  # noqa: E402

from samplers.kernels import _common, codes as KC, fused as K, ops  # noqa: E402
import samplers.kernels as kernels  # noqa: E402

from kernel_promise import assert_within_promise  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(_common.INTERPRET, reason="needs the compiled kernels: run with TRITON_INTERPRET=0"),
]

NINF = float("-inf")


def _logits(B, V, dtype=torch.float32, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g) * scale
    x[1 % B, torch.randperm(V, generator=g)[: V // 5]] = NINF
    return x.to(dtype).cuda()


@pytest.mark.parametrize("V", [1000, 8192, 8193, 32000, 50257, 128256, 151936])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_layout_rule_loads_on_this_device(V, dtype):
    """The static layout rule's choice loads on this GPU for the heaviest stage tuples (no
    OutOfResources caught, so the rule predicted it), and both layouts keep the promise."""
    K._OUT_OF_RESOURCES.clear()
    B = 4
    x = _logits(B, V, dtype)
    codes = [KC.PENALTIES, KC.TOP_K, KC.TOP_P, KC.TYPICAL, KC.MIN_P, KC.XTC_PHILOX]
    seen = torch.zeros(B, V, dtype=torch.bool, device="cuda")
    counts = torch.zeros(B, V, dtype=torch.int32, device="cuda")
    table = KC.param_table(B, x.device, {"top_k": torch.full((B,), 50.0), "top_p": torch.full((B,), 0.9),
                                         "typical_p": torch.full((B,), 0.95), "min_p": torch.full((B,), 0.02)})
    words = torch.tensor([split_seed(s) for s in range(B)], dtype=torch.int64).t().cuda()
    keys = KC.key_words(words[0], words[1], torch.zeros_like(words[0]), torch.zeros_like(words[0]))
    greedy = torch.zeros(B, dtype=torch.bool, device="cuda")
    out, tok, _ = K.run_chain(x, codes, [None] * len(codes), table, seen=seen, counts=counts, keys=keys,
                              draw_greedy=greedy)
    torch.cuda.synchronize()
    assert not K._OUT_OF_RESOURCES, f"{_common.pick_layout(x)} chain did not load: {K._OUT_OF_RESOURCES}"
    assert ((tok >= 0) & (tok < V)).all() and not torch.isneginf(out.gather(1, tok[:, None])).any()


def test_exact_stages_are_bit_identical_to_torch_on_the_gpu():
    """Penalties, temperature, smoothing, top_k: with fp fusion off and ``div_rn``, the same
    bits as torch's op-by-op reference on the same GPU."""
    B, V = 8, 32000
    x = _logits(B, V)
    g = torch.Generator().manual_seed(3)
    seen = (torch.rand(B, V, generator=g) < 0.05).cuda()
    counts = (torch.randint(0, 4, (B, V), generator=g).cuda() * seen).to(torch.int32)
    r, f, pr = (torch.full((B,), v, device="cuda") for v in (1.3, 0.37, 0.21))
    assert torch.equal(ops.penalties(x, seen, counts, r, f, pr), F.penalties(x, seen, counts, r, f, pr))
    t = torch.linspace(0.3, 1.7, B, device="cuda")
    assert torch.equal(ops.temperature(x, t), F.temperature(x, t))
    sf, sc = torch.full((B,), 0.31, device="cuda"), torch.full((B,), 1.7, device="cuda")
    assert torch.equal(ops.quadratic_smoothing(x, sf, sc), F.quadratic_smoothing(x, sf, sc))
    k = torch.tensor([1, 2, 50, 999, 0, V, 31999, 7], device="cuda")
    assert torch.equal(ops.top_k(x, k), F.top_k(x, k))


@pytest.mark.parametrize("V", [1000, 32000, 151936])
@pytest.mark.parametrize("name,value", [
    ("top_p", 0.9), ("typical_p", 0.9), ("min_p", 0.05), ("top_a", 0.2), ("eta_cutoff", 3e-4),
    ("epsilon_cutoff", 3e-4), ("nsigma", 1.5)])
def test_threshold_stages_keep_the_promise(V, name, value):
    """ex2.approx, div.full and another summation order: a token may be decided differently
    from the reference only within THRESHOLD_RTOL of the threshold."""
    B = 16
    x = _logits(B, V, seed=5)
    p = torch.full((B,), value, device="cuda")
    got = getattr(ops, name)(x, p)
    assert_within_promise(got, getattr(F, name), x, name, p)


@pytest.mark.parametrize("V", [1000, 151936])
def test_the_draw_never_returns_a_removed_token_or_an_index_outside_the_row(V):
    """The GPU's scan order can make the prefix dip or step on p = 0 lanes; many rows with
    many p = 0 lanes and whole zero-mass tiles: every token has p > 0 and lies in the row;
    tokens differ from the reference's only on rows where u * total is near a boundary."""
    B = 2048
    g = torch.Generator().manual_seed(9)
    x = torch.randn(B, V, generator=g) * 3
    x[:, ::3] = NINF
    x[:, 8192:3 * 8192 if V > 3 * 8192 else V // 2] = NINF
    x[:, -(V // 7):] = NINF
    x = x.cuda()
    greedy = torch.zeros(B, dtype=torch.bool, device="cuda")
    u = torch.rand(B, generator=g).cuda()
    u[:64] = 0.99999994  # at the end of the mass: the last-positive fallback
    tok = kernels.draw_tokens(x, greedy, u)
    assert ((tok >= 0) & (tok < V)).all()
    assert not torch.isneginf(x.gather(1, tok[:, None])).any()
    want = ref_draw(x, greedy, u)
    # the rows drawn at the end of the mass may pick any of its last tokens (float32 prefix
    # sums in the GPU's order against the reference's): the token must only lie there
    after = 1 - torch.softmax(x.double(), -1).cumsum(-1).gather(1, tok[:, None])[:, 0]  # mass past the token
    assert (after[:64] <= 1e-4).all()
    assert int((tok != want)[64:].sum()) <= max(2, B // 500)


def test_a_seeded_row_does_not_depend_on_what_else_is_batched():
    """The same seeded request alone, in a batch of 7 and in one of 300 (other batch-size
    buckets, some other rows asking for top logprobs): the same processed row, bit for bit,
    the same token and the same log-probability (static layout and warps: nothing chosen per
    batch; the chosen log-probability from the row's own request)."""
    V = 32000
    mine = SamplingParams(seed=1234, top_k=100, top_p=0.9, min_p=0.02, temperature=0.8)
    g = torch.Generator().manual_seed(4)
    row = torch.randn(1, V, generator=g) * 4
    results = []
    for B in (1, 7, 300):
        others = [SamplingParams(seed=s, top_p=0.5 + s / 1000, logprobs=2 if s % 3 == 0 else None)
                  for s in range(B - 1)]
        batch = SamplingBatch([mine] + others, [[]] * B, [[]] * B, vocab_size=V, device="cuda")
        logits = torch.cat([row, torch.randn(B - 1, V, generator=g) * 4]).cuda()
        pipe = SamplerPipeline("triton", seed=0)
        drawn = pipe.sample(logits, batch)
        results.append((pipe.process(logits, batch)[0].clone(), int(drawn.token_ids[0]), float(drawn.logprobs[0])))
    for processed, token, logprob in results[1:]:
        assert torch.equal(processed, results[0][0]) and token == results[0][1] and logprob == results[0][2]


def test_the_reference_draw_does_not_depend_on_the_batch_size():
    """The torch backend's draw (and the vLLM integration's, on any backend) scans in float64
    on a GPU: the same rows alone, in a batch of 8 and in one of 300 (other cumsum groupings,
    which move float32 sums by ulps) draw the same tokens with the same uniforms. Flat rows,
    no truncation: where float32 sums would flip ~0.2% of draws."""
    V, n = 32000, 64
    g = torch.Generator().manual_seed(12)
    rows = torch.randn(n, V, generator=g)
    u = torch.rand(n, generator=g)
    no = torch.zeros(n, dtype=torch.bool)
    alone = [int(ref_draw(rows[i:i + 1].cuda(), no[:1].cuda(), u[i:i + 1].cuda())) for i in range(n)]
    for B in (8, 300):
        filler = torch.randn(B - 1, V, generator=g)
        for i in range(n):
            x = torch.cat([rows[i:i + 1], filler]).cuda()
            uu = torch.cat([u[i:i + 1], torch.rand(B - 1, generator=g)]).cuda()
            assert int(ref_draw(x, torch.zeros(B, dtype=torch.bool, device="cuda"), uu)[0]) == alone[i]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_follow_the_tensors_device():
    """Logits on cuda:1 while cuda:0 is current: the kernels launch on cuda:1 (no fault) and
    give what they give on cuda:0."""
    x0 = _logits(4, 50257, torch.bfloat16, seed=2)
    table0 = KC.param_table(4, x0.device, {"top_k": torch.full((4,), 40.0), "top_p": torch.full((4,), 0.9)})
    want = K.run_chain(x0, [KC.TOP_K, KC.TOP_P], [None, None], table0)
    x1, table1 = x0.to("cuda:1"), table0.to("cuda:1")
    with torch.cuda.device(0):
        got = K.run_chain(x1, [KC.TOP_K, KC.TOP_P], [None, None], table1)
        torch.cuda.synchronize(1)
    assert got.device == torch.device("cuda", 1) and torch.equal(got.cpu(), want.cpu())
    u = torch.rand(4).to("cuda:1")
    with torch.cuda.device(0):
        assert torch.equal(kernels.draw_tokens(x1, torch.zeros(4, dtype=torch.bool, device="cuda:1"), u).cpu(),
                           kernels.draw_tokens(x0, torch.zeros(4, dtype=torch.bool, device="cuda:0"), u.cuda(0)).cpu())
        row_uniforms(*(torch.arange(4, device="cuda:1"),) * 4, 0)


@pytest.mark.parametrize("V", [32000, 151936])
def test_a_steady_state_step_can_be_captured_in_a_cuda_graph(V):
    """After warm-up, a ``sample`` step of seeded rows is captured in a CUDA graph (no device
    sync, no host value, no layout timing during capture) and its replay on new logits gives
    the eager step's tokens."""
    B = 8
    params = [SamplingParams(seed=10 + i, top_k=50, top_p=0.9, min_p=0.02, temperature=0.9,
                             repetition_penalty=1.1) for i in range(B)]
    batch = SamplingBatch(params, [[1, 2, 3]] * B, [[4, 5]] * B, vocab_size=V, device="cuda")
    pipe = SamplerPipeline("triton", seed=0)
    static = _logits(B, V, seed=20)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            pipe.sample(static, batch)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pipe.sample(static, batch)
    fresh = _logits(B, V, seed=21)
    static.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.token_ids, pipe.sample(fresh, batch).token_ids)


@pytest.mark.parametrize("V", [32000, 128256])
def test_a_rows_draw_does_not_depend_on_whether_the_chain_draws_it(V):
    """A skewed neighbour moves every row's draw from the end of the chain's launch to the
    separate draw kernel: rows that min_p or top_k truncate and a row with 12 finite entries,
    alone and beside it, draw the same token with the same log-probability, bit for bit. Both
    vocabularies run the blocked layout on a GPU, where the two kernels' [KMAX] lists must
    reduce in the same order (kernels/README.md, "One draw rule per layout"). Last in the
    file: its compilations must not starve the checks above of gpu_check.sh's budget."""
    from test_kernels_pipeline import check_a_rows_draw_alone_and_beside

    check_a_rows_draw_alone_and_beside(dict(skew=0.5), V=V, device="cuda", steps=4, require_differences=False)
