"""Resume a recording after an interruption, and restart from an earlier checkpoint.

python examples/resume.py runs/resume
"""

import argparse

import torch

import trajscope
from trajscope import zoo


def train(run, model, opt, loss_fn, data, start, stop, **recorder_kwargs):
    x, y = data
    with trajscope.Recorder(
        run, model, opt, loss_fn, model_spec="trajscope.zoo:mlp", model_kwargs={"sizes": [8, 16, 1]}, **recorder_kwargs
    ) as rec:
        for step in range(start, stop):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            rec.batch(x, y)
            opt.step()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    data = (torch.randn(64, 8), torch.randn(64, 1))
    model = zoo.mlp([8, 16, 1])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = torch.nn.MSELoss()

    train(args.run, model, opt, loss_fn, data, 0, 30, overwrite=True)  # steps 0..29
    saved = {k: v.clone() for k, v in model.state_dict().items()}  # a user checkpoint after step 29
    train(args.run, model, opt, loss_fn, data, 30, 50, resume=True)  # continues at step 30
    model.load_state_dict(saved)  # training restarts from step 30:
    train(args.run, model, opt, loss_fn, data, 30, 40, resume=True, step=30)  # records 30.. are replaced
    run = trajscope.open_run(args.run)
    print(f"{args.run}: steps {run.steps[0]}..{run.steps[-1]}, restarts: {run.restarts}")


if __name__ == "__main__":
    main()
