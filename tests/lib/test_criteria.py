import torch

from granet import criteria


def test_builtin_scores_have_the_public_signature():
    w = torch.tensor([[-3.0, 1.0], [0.5, -2.0]])
    g = torch.tensor([[0.1, -4.0], [2.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    ctx = dict(name="w", index=0, mask=w != 0, state={}, generator=gen, step=1)
    assert torch.equal(criteria.magnitude(w, g, **ctx), w.abs())
    assert torch.equal(criteria.gradient(w, g, **ctx), g.abs())
    assert criteria.gradient(w, None, **ctx) is None  # no signal before a backward pass
    r = criteria.random(w, g, **ctx)
    assert r.shape == w.shape
    assert torch.equal(
        r, criteria.random(w, g, **{**ctx, "generator": torch.Generator().manual_seed(0)})
    )


def test_registries_build_the_builtins_from_the_optimizer():
    p = torch.nn.Parameter(torch.zeros(2))
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.8)
    adam = torch.optim.Adam([p], betas=(0.7, 0.99))
    assert criteria.IMPORTANCE["magnitude"](sgd) is criteria.magnitude
    assert criteria.GROWTH["gradient"](sgd) is criteria.gradient
    assert criteria.GROWTH["momentum"](sgd).beta == 0.8
    assert criteria.GROWTH["momentum"](adam).beta == 0.7
    assert criteria.GROWTH["momentum"](torch.optim.SGD([p], lr=0.1)).beta == 0.9


def test_momentum_averages_gradients_and_follows_their_dtype():
    p = torch.nn.Parameter(torch.zeros(3))
    m = criteria.Momentum(beta=0.5)
    assert m(p, None, index=0) is None
    p.grad = torch.tensor([2.0, -2.0, 0.0])
    m.observe([p])
    m.observe([p])
    assert torch.allclose(m(p, p.grad, index=0), torch.tensor([1.5, 1.5, 0.0]))
    half = torch.nn.Parameter(p.detach().bfloat16())  # as after ``model.bfloat16()``
    half.grad = p.grad.bfloat16()
    m.observe([half])
    assert m.buffers[0].dtype == torch.bfloat16
    restored = criteria.Momentum()
    restored.load_state_dict(m.state_dict())
    assert restored.beta == 0.5 and torch.equal(restored.buffers[0], m.buffers[0])
