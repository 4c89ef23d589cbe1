"""ResNet-20 for 32x32 images (He et al. 2016, section 4.2), written the way a user writes a network:
a Module subclass with its own ``forward``.

conv3x3(16) -> BN -> ReLU -> 3 stages of 3 basic blocks (16, 32, 64 channels; the first block of
stages 2 and 3 halves the image) -> global average pooling -> Linear to the classes. A basic block is
conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus its input, then ReLU. The shortcut is the identity; where
a block halves the image and doubles the channels it takes every second pixel and pads the channels
with zeros (the paper's option A), so the shortcuts add no parameters: about 0.27M in all.
"""
from __future__ import annotations

from .. import ops
from ..nn import BatchNorm2d, Conv2d, GlobalAvgPool2d, Linear, Module
from ..ops.layout import memory_order, zeros_in_order


def conv3x3(cin, cout, stride=1):
    return Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False, init_fn="he_normal")


class BasicBlock(Module):
    """(N, C_in, H, W) -> (N, C_out, H / stride, W / stride)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, cout, stride), BatchNorm2d(cout)
        self.conv2, self.bn2 = conv3x3(cout, cout), BatchNorm2d(cout)
        self.stride, self.extra = stride, cout - cin

    def shortcut(self, x):
        """The identity; every second pixel with zero channels on both sides where the shape changes."""
        if self.stride == 1 and self.extra == 0:
            return x
        x = x[:, :, ::self.stride, ::self.stride]
        n, c, h, w = x.shape
        half = zeros_in_order((n, self.extra // 2, h, w), x.dtype, memory_order(x.data))   # laid out as x
        return ops.concat([half, x, half], axis=1)

    def forward(self, x):
        out = self.bn1(self.conv1(x), relu=True)              # batch norm and its ReLU in one pass
        return ops.add_relu(self.bn2(self.conv2(out)), self.shortcut(x))


class ResNet(Module):
    """x (N, C, H, W) -> logits (N, num_classes)."""

    def __init__(self, num_classes=10, blocks=(3, 3, 3), widths=(16, 32, 64), in_channels=3):
        super().__init__()
        self.conv, self.bn = conv3x3(in_channels, widths[0]), BatchNorm2d(widths[0])
        cin = widths[0]
        for stage, (n, width) in enumerate(zip(blocks, widths)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                setattr(self, f"layer{stage + 1}_{i}", BasicBlock(cin, width, stride))
                cin = width
        self.pool, self.fc = GlobalAvgPool2d(), Linear(cin, num_classes)
        self.depth = len(blocks)

    def forward(self, x):
        x = self.bn(self.conv(x), relu=True)
        for name, block in self._modules.items():
            if name.startswith("layer"):
                x = block(x)
        return self.fc(self.pool(x))


def resnet20(num_classes=10, in_channels=None, input_shape=(3, 32, 32)):
    """ResNet-20: 3 stages of 3 basic blocks, 16/32/64 channels (0.27M parameters for 10 classes)."""
    return ResNet(num_classes, (3, 3, 3), (16, 32, 64), in_channels or input_shape[0])
