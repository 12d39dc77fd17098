import pytest
import torch

from curate.gradients import per_example_sq_norm, probe_batch
from curate.roles import role_map
from tests.autograd_reference import reference_norm


def naive_norms(model, ids: list[int], mask: list[int], names: list[str] | None = None):
    """One example, no padding, ordinary autograd on the weights through the model's own forward: the
    reference. Each entry's norm is read off the full weight gradient by tests.autograd_reference."""
    names = names or role_map(model).names
    model = model.requires_grad_(True)
    model.zero_grad()
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits[0, :-1]
    target = torch.tensor(mask[1:]).bool()
    loss = torch.nn.functional.cross_entropy(logits[target], x[0, 1:][target])
    loss.backward()
    norms = [reference_norm(model, name) for name in names]
    model.zero_grad()
    model.requires_grad_(False)
    return loss.item(), torch.tensor(norms, dtype=torch.float64)


def make_examples(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t = int(torch.randint(6, 40, (1,), generator=g))
        ids = torch.randint(0, 256, (t,), generator=g).tolist()
        start = int(torch.randint(1, t - 2, (1,), generator=g))
        mask = [0] * start + [1] * (t - start)
        if i % 3 == 0:  # two separate assistant spans, like a multi-turn trajectory
            mask[start + (t - start) // 2] = 0
        out.append((ids, mask))
    return out


def batch(examples):
    t = max(len(ids) for ids, _ in examples)
    pad = lambda xs: [x + [0] * (t - len(x)) for x in xs]
    ids = torch.tensor(pad([e[0] for e in examples]))
    att = torch.tensor(pad([[1] * len(e[0]) for e in examples]))
    loss = torch.tensor(pad([e[1] for e in examples]))
    return ids, att, loss


def probe(model, examples, rmap=None):
    res = probe_batch(model, rmap or role_map(model), *batch(examples))
    return res.loss.double(), res.sq_norms.double().sqrt()


def test_module_order_is_layer_then_projection(tiny_model):
    names = role_map(tiny_model).names
    assert len(names) == 14
    assert names[0].endswith("layers.0.self_attn.q_proj") and names[6].endswith("layers.0.mlp.down_proj")
    assert names[7].endswith("layers.1.self_attn.q_proj")


def assert_matches_autograd(model, examples, rmap=None) -> None:
    """The batched probe's loss (1e-5) and norms (1e-4 relative) equal one-example autograd's."""
    rmap = rmap or role_map(model)
    loss, norms = probe(model, examples, rmap)
    for i, (ids, mask) in enumerate(examples):
        ref_loss, ref = naive_norms(model, ids, mask, rmap.names)
        assert loss[i].item() == pytest.approx(ref_loss, rel=1e-5)
        torch.testing.assert_close(norms[i], ref, rtol=1e-4, atol=0)


def test_batched_norms_equal_naive_autograd(tiny_model):
    assert_matches_autograd(tiny_model, make_examples(7))


def test_norms_do_not_depend_on_batch_mates(tiny_model):
    examples = make_examples(6, seed=3)
    _, together = probe(tiny_model, examples)
    _, alone = probe(tiny_model, examples[2:3])
    _, other_mates = probe(tiny_model, [examples[5], examples[2], examples[0]])
    torch.testing.assert_close(together[2], alone[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(together[2], other_mates[1], rtol=1e-5, atol=0)


@pytest.mark.parametrize("t", [3, 200])  # Gram form wins at small T, product form at large T
def test_both_exact_forms_agree_with_explicit_product(t):
    g = torch.Generator().manual_seed(0)
    a, grad = torch.randn(3, t, 16, generator=g), torch.randn(3, t, 24, generator=g)
    ref = torch.stack([(grad[i].T.double() @ a[i].double()).square().sum() for i in range(3)])
    torch.testing.assert_close(per_example_sq_norm(a, grad).double(), ref, rtol=1e-5, atol=0)


def test_weights_are_untouched_and_frozen(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    probe(tiny_model, make_examples(3))
    assert all(p.grad is None and not p.requires_grad for p in tiny_model.parameters())
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_probes_in_threads_of_one_process_give_what_each_gives_alone(family):
    """A dask worker with several threads shares one cached model: the hooks of two probes at once would see
    each other's forward (an error, or experts switched under the other probe), so they take turns."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.test_architectures import build

    model = build(family)
    rmap = role_map(model)
    batches = [batch(make_examples(3, seed=s)) for s in range(6)]
    alone = [probe_batch(model, rmap, *b).sq_norms for b in batches]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda b: probe_batch(model, rmap, *b).sq_norms, batches * 2))
    for i, sq in enumerate(together):
        assert torch.equal(sq, alone[i % len(batches)])


@pytest.mark.parametrize("flattened", [False, True])
def test_a_layer_that_runs_sequence_first_is_refused_even_when_batch_and_length_agree(flattened):
    """The hooks read a layer's rows as batch-major by shape; a (T, B, d) input passed for (B, T, d) when
    B == T, or a (T·B, d) one always, would pair one example's tokens with another's and give wrong norms
    without an error. Two identical examples, once per model, catch it."""
    from tests.conftest import tiny_llama

    model = tiny_llama()
    mlp = model.model.layers[1].mlp

    def sequence_first(x):
        b, t, d = x.shape
        x = x.transpose(0, 1)
        x = x.reshape(t * b, d) if flattened else x
        y = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        return (y.reshape(t, b, -1) if flattened else y).transpose(0, 1)

    mlp.forward = sequence_first
    ids = torch.randint(1, 200, (4, 4))  # B == T: the shapes alone cannot tell the layout
    ones = torch.ones_like(ids)
    with pytest.raises(RuntimeError, match="identical examples|neither the batch's"):
        probe_batch(model, role_map(model), ids, ones, ones)
