"""Model files the tests share: small nets that train in seconds on any device."""

# the smallest trainable model: one fc layer on 8x8 synthetic images (a run takes a fraction of a second)
MICRO = """
[data]
type = data
channels = 1
size = 8
scale = 0.0039
[fc]
type = fc
inputs = data
outputs = 4
[probs]
type = softmax
inputs = fc
[train]
dataset = synthetic
batch_size = 16
lr = 0.1
epochs = 1
"""


# conv, max pooling, dropout and two fc layers on 8x8 synthetic images: the training loop's net
TINY = """
[data]
type = data
channels = 1
size = 8
scale = 0.0039215686
[conv1]
type = conv
inputs = data
filters = 4
size = 3
padding = 1
neuron = relu
initW = he
[pool1]
type = pool
inputs = conv1
pool = max
size = 2
stride = 2
[fc2]
type = fc
inputs = pool1
outputs = 16
neuron = relu
initW = he
[drop2]
type = dropout
inputs = fc2
keep = 0.8
[fc3]
type = fc
inputs = drop2
outputs = 4
initW = 0.01
[probs]
type = softmax
inputs = fc3
[train]
dataset = synthetic
batch_size = 16
lr = 0.1
epochs = 3
"""


# conv, max pooling and fc on 24x24 RGB images of a prepared ImageNet-format dataset
TINY_RGB = """
[data]
type = data
channels = 3
size = 24
scale = 0.00392156862745098

[conv1]
type = conv
inputs = data
filters = 8
size = 5
stride = 2
neuron = relu
initW = he

[pool1]
type = pool
inputs = conv1
pool = max
size = 3
stride = 2

[fc2]
type = fc
inputs = pool1
outputs = 3
initW = 0.01

[probs]
type = softmax
inputs = fc2

[train]
dataset = imagenet
batch_size = 4
lr = 0.01
flip = true
"""


# a conv on each of two towers (device = 0, 1), joined by an fc on tower 1: activations cross both ways
TWO_TOWERS = """
[data]
type = data
channels = 1
size = 8
[conva]
type = conv
inputs = data
filters = 3
size = 3
padding = 1
neuron = relu
device = 0
[convb]
type = conv
inputs = data
filters = 3
size = 3
padding = 1
neuron = relu
gpu = 1
[fc]
type = fc
inputs = conva, convb
outputs = 4
device = 1
[probs]
type = softmax
inputs = fc
device = 0
[train]
dataset = synthetic
batch_size = 8
lr = 0.05
epochs = 1
"""


# a small two-tower net with a dropout layer split across the towers, and the same net on one device (grouped)
TOWERS_DROP = """
[data]
type = data
channels = 1
size = 8
[conva]
type = conv
inputs = data
filters = 3
size = 3
padding = 1
neuron = relu
device = 0
[convb]
type = conv
inputs = data
filters = 3
size = 3
padding = 1
neuron = relu
device = 1
[fca]
type = fc
inputs = conva, convb
outputs = 6
neuron = relu
device = 0
[fcb]
type = fc
inputs = conva, convb
outputs = 6
neuron = relu
device = 1
[dropa]
type = dropout
inputs = fca
maskOf = drop
device = 0
[dropb]
type = dropout
inputs = fcb
maskOf = drop
maskStart = 6
device = 1
[out]
type = fc
inputs = dropa, dropb
outputs = 4
device = 0
[probs]
type = softmax
inputs = out
device = 0
[train]
dataset = synthetic
batch_size = 8
lr = 0.01
epochs = 2
"""


GROUPED_DROP = """
[data]
type = data
channels = 1
size = 8
[conv]
type = conv
inputs = data
filters = 6
size = 3
padding = 1
neuron = relu
[fc]
type = fc
inputs = conv
outputs = 12
neuron = relu
[drop]
type = dropout
inputs = fc
[out]
type = fc
inputs = drop
outputs = 4
[probs]
type = softmax
inputs = out
[train]
dataset = synthetic
batch_size = 8
lr = 0.01
epochs = 2
"""
