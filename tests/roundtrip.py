"""Shared check: an optimizer saved mid-run and loaded with weights_only=True continues bit for bit."""

import io

import torch


def _step(params, opt, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


def assert_resumes_bit_for_bit(make, grads, split=3):
    """``make()`` -> (params, optimizer) built identically each call; ``grads`` is a list of per-step grad lists."""
    params_a, opt_a = make()
    _step(params_a, opt_a, grads)
    params_b, opt_b = make()
    _step(params_b, opt_b, grads[:split])
    buf = io.BytesIO()
    torch.save({"opt": opt_b.state_dict(), "params": [p.detach() for p in params_b]}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    params_c, opt_c = make()
    with torch.no_grad():
        for p, s in zip(params_c, saved["params"]):
            p.copy_(s)
    opt_c.load_state_dict(saved["opt"])
    _step(params_c, opt_c, grads[split:])
    for a, c in zip(params_a, params_c):
        assert torch.equal(a.detach(), c.detach())
