"""Small models with the patterns the capture and site tests need."""
import torch
import torch.nn.functional as F
from torch import nn


class ConvBNReLU(nn.Module):
    def __init__(self, cin=3, cout=8, bias=False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class DataDependentGate(nn.Module):
    """Its own forward branches on data: cannot be traced even with leaves."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > 0:
            return y
        return -y


class WrapsGate(nn.Module):
    """Traceable itself, except for the gate inside; also holds a traceable block."""

    def __init__(self, c=8):
        super().__init__()
        self.block = ConvBNReLU(c, c)
        self.gate = DataDependentGate(c)

    def forward(self, x):
        return self.gate(self.block(x))


class NestedUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ConvBNReLU(3, 8)
        self.body = WrapsGate(8)
        self.head = nn.Linear(8, 4)
        self.unused = nn.Linear(3, 3)  # never called: must survive capture (state_dict keys)

    def forward(self, x):
        x = self.body(self.stem(x))
        return self.head(x.mean((2, 3)))


class UntraceableRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = ConvBNReLU(3, 8)
        self.b = ConvBNReLU(8, 8)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.a(x)
        if x.mean() > 0.5:
            x = self.b(x)
        return self.bn(x)


class TrainOnlyBranch(nn.Module):
    """Like Inception's aux head: an extra BN branch only in training."""

    def __init__(self):
        super().__init__()
        self.main = ConvBNReLU(3, 8)
        self.aux = ConvBNReLU(8, 8)

    def forward(self, x):
        y = self.main(x)
        if self.training:
            return y, self.aux(y)
        return y


class Patterns(nn.Module):
    """One of each neighbour pattern sites.py must recognise."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)          # conv -> bn -> F.relu
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)          # producer with two users -> no producer; .relu_() method
        self.bn_shared = nn.BatchNorm2d(8)    # called twice
        self.lin = nn.Linear(8, 6)
        self.bn1d = nn.BatchNorm1d(6)         # linear -> bn1d -> SiLU module
        self.act = nn.SiLU()
        self.register_buffer("fmean", torch.zeros(6))
        self.register_buffer("fvar", torch.ones(6))

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        c = self.conv2(x)
        y = self.bn2(c).relu_()
        y = self.bn_shared(y + c)
        y = self.bn_shared(y)
        v = self.act(self.bn1d(self.lin(y.mean((2, 3)))))
        return F.batch_norm(v, self.fmean, self.fvar, training=False)
