"""Record an Adam run with keyword inputs and a fixed probe batch.

python examples/record_adam.py runs/adam --steps 200
"""

import argparse

import torch
from torch import nn

import trajscope


class TwoInputNet(nn.Module):
    """A model called with keyword inputs: ``model(features=..., mask=...)``."""

    def __init__(self, d_in: int = 16, hidden: int = 32, d_out: int = 3):
        super().__init__()
        self.encoder = nn.Linear(d_in, hidden)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, features, mask):
        return self.head(torch.relu(self.encoder(features * mask)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = TwoInputNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(512, 16), torch.randint(0, 3, (512,))
    probe = ({"features": x[:64], "mask": torch.ones(64, 16)}, y[:64])
    # No model_spec: the model class lives in this script, so the Recorder's torch.export program is
    # what rebuilds it offline (analyse with --trust, or --model examples.record_adam:TwoInputNet).
    with trajscope.Recorder(args.run, model, opt, loss_fn, every=10, probe=probe, overwrite=True) as rec:
        for step in range(args.steps):
            idx = torch.randint(0, 512, (64,))
            inputs = {"features": x[idx], "mask": (torch.rand(64, 16) > 0.1).float()}
            loss = loss_fn(model(**inputs), y[idx])
            opt.zero_grad()
            loss.backward()
            rec.batch(inputs, y[idx])
            opt.step()
    print(f"recorded to {args.run}; next: trajscope analyze {args.run} --trust")


if __name__ == "__main__":
    main()
