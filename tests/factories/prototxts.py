"""Caffe prototxt texts for the tests: tiny nets, each exercising some layer types and parameter
forms (:data:`TINY_NETS`), the nets behind the Deep Compression and OpenVINO writers, and the real
architectures AlexNet (BVLC deploy), VGG-16 (deploy, old V1 ``layers`` format) and OverFeat "fast".
"""
from __future__ import annotations


BVLC_ALEXNET_DEPLOY = """
name: "AlexNet"
input: "data"
input_dim: 10
input_dim: 3
input_dim: 227
input_dim: 227
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 96 kernel_size: 11 stride: 4 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "norm1" type: "LRN" bottom: "conv1" top: "norm1"
  lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layer { name: "pool1" type: "Pooling" bottom: "norm1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 256 pad: 2 kernel_size: 5 group: 2 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "norm2" type: "LRN" bottom: "conv2" top: "norm2"
  lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layer { name: "pool2" type: "Pooling" bottom: "norm2" top: "pool2"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "conv3" type: "Convolution" bottom: "pool2" top: "conv3"
  convolution_param { num_output: 384 pad: 1 kernel_size: 3 } }
layer { name: "relu3" type: "ReLU" bottom: "conv3" top: "conv3" }
layer { name: "conv4" type: "Convolution" bottom: "conv3" top: "conv4"
  convolution_param { num_output: 384 pad: 1 kernel_size: 3 group: 2 } }
layer { name: "relu4" type: "ReLU" bottom: "conv4" top: "conv4" }
layer { name: "conv5" type: "Convolution" bottom: "conv4" top: "conv5"
  convolution_param { num_output: 256 pad: 1 kernel_size: 3 group: 2 } }
layer { name: "relu5" type: "ReLU" bottom: "conv5" top: "conv5" }
layer { name: "pool5" type: "Pooling" bottom: "conv5" top: "pool5"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "fc6" type: "InnerProduct" bottom: "pool5" top: "fc6"
  inner_product_param { num_output: 4096 } }
layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }
layer { name: "drop6" type: "Dropout" bottom: "fc6" top: "fc6" dropout_param { dropout_ratio: 0.5 } }
layer { name: "fc7" type: "InnerProduct" bottom: "fc6" top: "fc7"
  inner_product_param { num_output: 4096 } }
layer { name: "relu7" type: "ReLU" bottom: "fc7" top: "fc7" }
layer { name: "drop7" type: "Dropout" bottom: "fc7" top: "fc7" dropout_param { dropout_ratio: 0.5 } }
layer { name: "fc8" type: "InnerProduct" bottom: "fc7" top: "fc8"
  inner_product_param { num_output: 1000 } }
layer { name: "prob" type: "Softmax" bottom: "fc8" top: "prob" }
"""

ALEXNET_PROTOTXT_URL = (
    "https://github.com/songhan/Deep-Compression-AlexNet/raw/"
    "a4ab6859e1bc86dec3607c8cdd53b0a72da6bcda/bvlc_alexnet_deploy.prototxt"
)


def vgg16_prototxt() -> str:
    """VGG-16's deploy prototxt (VGG_ILSVRC_16_layers_deploy) in the old V1 ``layers`` format."""
    lines = ['name: "VGG_ILSVRC_16_layers"', 'input: "data"',
             "input_dim: 10", "input_dim: 3", "input_dim: 224", "input_dim: 224"]
    bottom = "data"
    for block, (convs, width) in enumerate([(2, 64), (2, 128), (3, 256), (3, 512), (3, 512)], start=1):
        for i in range(1, convs + 1):
            name = f"conv{block}_{i}"
            lines.append(f'layers {{ bottom: "{bottom}" top: "{name}" name: "{name}" type: CONVOLUTION '
                         f"convolution_param {{ num_output: {width} pad: 1 kernel_size: 3 }} }}")
            lines.append(f'layers {{ bottom: "{name}" top: "{name}" name: "relu{block}_{i}" type: RELU }}')
            bottom = name
        lines.append(f'layers {{ bottom: "{bottom}" top: "pool{block}" name: "pool{block}" type: POOLING '
                     "pooling_param { pool: MAX kernel_size: 2 stride: 2 } }")
        bottom = f"pool{block}"
    for name, width in (("fc6", 4096), ("fc7", 4096), ("fc8", 1000)):
        lines.append(f'layers {{ bottom: "{bottom}" top: "{name}" name: "{name}" type: INNER_PRODUCT '
                     f"inner_product_param {{ num_output: {width} }} }}")
        bottom = name
        if name != "fc8":
            k = name[2:]
            lines.append(f'layers {{ bottom: "{name}" top: "{name}" name: "relu{k}" type: RELU }}')
            lines.append(f'layers {{ bottom: "{name}" top: "{name}" name: "drop{k}" type: DROPOUT '
                         "dropout_param { dropout_ratio: 0.5 } }")
    lines.append('layers { bottom: "fc8" top: "prob" name: "prob" type: SOFTMAX }')
    return "\n".join(lines) + "\n"


# OverFeat "fast" (Sermanet et al. 2014, table 1): 231 x 231 input; conv3-5 pad 1, conv2 pad 0.
OVERFEAT_FAST_PROTOTXT = """
name: "OverFeat_fast"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 231 dim: 231 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 96 kernel_size: 11 stride: 4 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 256 kernel_size: 5 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv3" type: "Convolution" bottom: "pool2" top: "conv3"
  convolution_param { num_output: 512 pad: 1 kernel_size: 3 } }
layer { name: "relu3" type: "ReLU" bottom: "conv3" top: "conv3" }
layer { name: "conv4" type: "Convolution" bottom: "conv3" top: "conv4"
  convolution_param { num_output: 1024 pad: 1 kernel_size: 3 } }
layer { name: "relu4" type: "ReLU" bottom: "conv4" top: "conv4" }
layer { name: "conv5" type: "Convolution" bottom: "conv4" top: "conv5"
  convolution_param { num_output: 1024 pad: 1 kernel_size: 3 } }
layer { name: "relu5" type: "ReLU" bottom: "conv5" top: "conv5" }
layer { name: "pool5" type: "Pooling" bottom: "conv5" top: "pool5"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc6" type: "InnerProduct" bottom: "pool5" top: "fc6" inner_product_param { num_output: 3072 } }
layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }
layer { name: "drop6" type: "Dropout" bottom: "fc6" top: "fc6" }
layer { name: "fc7" type: "InnerProduct" bottom: "fc6" top: "fc7" inner_product_param { num_output: 4096 } }
layer { name: "relu7" type: "ReLU" bottom: "fc7" top: "fc7" }
layer { name: "drop7" type: "Dropout" bottom: "fc7" top: "fc7" }
layer { name: "fc8" type: "InnerProduct" bottom: "fc7" top: "fc8" inner_product_param { num_output: 1000 } }
layer { name: "prob" type: "Softmax" bottom: "fc8" top: "prob" }
"""

# Blob shapes (C, H, W) the real architectures must have; checked by the tests.
OVERFEAT_FAST_SHAPES = {
    "conv1": (96, 56, 56), "pool1": (96, 28, 28), "conv2": (256, 24, 24), "pool2": (256, 12, 12),
    "conv3": (512, 12, 12), "conv4": (1024, 12, 12), "conv5": (1024, 12, 12), "pool5": (1024, 6, 6),
    "fc6": (3072,), "fc7": (4096,), "fc8": (1000,),
}


def _input_layer(c: int, h: int, w: int) -> str:
    return (f'layer {{ name: "data" type: "Input" top: "data" '
            f"input_param {{ shape {{ dim: 1 dim: {c} dim: {h} dim: {w} }} }} }}\n")


# Tiny nets, each exercising some layer types and parameter forms.
TINY_NETS: dict[str, str] = {
    "conv_group_dilation": 'name: "conv_group_dilation"\n' + _input_layer(4, 13, 11) + """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 group: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param { num_output: 9 kernel_h: 3 kernel_w: 2 pad_h: 2 pad_w: 0 stride_h: 2 stride_w: 1
                      dilation: 2 group: 3 bias_term: false } }
layer { name: "conv3" type: "Convolution" bottom: "conv2" top: "conv3"
  convolution_param { num_output: 5 kernel_size: 3 kernel_size: 1 pad: 0 pad: 1 stride: 1 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "conv3" top: "ip1" inner_product_param { num_output: 7 } }
layer { name: "relu2" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 3 bias_term: false } }
""",
    "pool_ceil": 'name: "pool_ceil"\n' + _input_layer(3, 12, 12) + """
layer { name: "max_pad" type: "Pooling" bottom: "data" top: "max_pad"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "ave_pad_overhang" type: "Pooling" bottom: "data" top: "ave_pad_overhang"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "ave_nopad" type: "Pooling" bottom: "data" top: "ave_nopad"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 } }
layer { name: "ave_pad_exact" type: "Pooling" bottom: "max_pad" top: "ave_pad_exact"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "max_rect" type: "Pooling" bottom: "data" top: "max_rect"
  pooling_param { pool: MAX kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0 } }
layer { name: "ave_rect" type: "Pooling" bottom: "data" top: "ave_rect"
  pooling_param { pool: AVE kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0 } }
layer { name: "max_dropped_window" type: "Pooling" bottom: "data" top: "max_dropped_window"
  pooling_param { pool: MAX kernel_size: 3 stride: 4 pad: 2 } }
layer { name: "ave_dropped_window" type: "Pooling" bottom: "data" top: "ave_dropped_window"
  pooling_param { pool: AVE kernel_size: 3 stride: 4 pad: 2 } }
""",
    "lrn": 'name: "lrn"\n' + _input_layer(7, 6, 5) + """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 1 } }
layer { name: "across" type: "LRN" bottom: "conv1" top: "across"
  lrn_param { local_size: 5 alpha: 0.5 beta: 0.75 k: 2 } }
layer { name: "within" type: "LRN" bottom: "across" top: "within"
  lrn_param { local_size: 3 alpha: 0.3 beta: 0.6 norm_region: WITHIN_CHANNEL } }
layer { name: "across_defaults" type: "LRN" bottom: "within" top: "across_defaults"
  lrn_param { local_size: 3 } }
layer { name: "within5" type: "LRN" bottom: "across_defaults" top: "within5"
  lrn_param { local_size: 5 alpha: 2 beta: 0.75 norm_region: WITHIN_CHANNEL } }
""",
    "concat_eltwise_split": 'name: "concat_eltwise_split"\n' + _input_layer(3, 8, 8) + """
layer { name: "conv_a" type: "Convolution" bottom: "data" top: "conv_a"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "conv_b" type: "Convolution" bottom: "data" top: "conv_b"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "split" type: "Split" bottom: "conv_a" top: "a1" top: "a2" }
layer { name: "sum" type: "Eltwise" bottom: "a1" bottom: "conv_b" bottom: "a2" top: "sum"
  eltwise_param { operation: SUM coeff: 1 coeff: 1 coeff: 1 } }
layer { name: "sum2" type: "Eltwise" bottom: "sum" bottom: "conv_b" top: "sum2" }
layer { name: "cat" type: "Concat" bottom: "sum2" bottom: "conv_b" bottom: "a1" top: "cat" }
layer { name: "conv_c" type: "Convolution" bottom: "cat" top: "conv_c"
  convolution_param { num_output: 5 kernel_size: 1 } }
layer { name: "relu_c" type: "ReLU" bottom: "conv_c" top: "conv_c" }
layer { name: "flat" type: "Flatten" bottom: "conv_c" top: "flat" }
layer { name: "ip" type: "InnerProduct" bottom: "flat" top: "ip" inner_product_param { num_output: 6 } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
""",
    "global_pool": 'name: "global_pool"\n' + """
layer { name: "train_data" type: "Data" top: "data" include { phase: TRAIN } }
layer { name: "data" type: "Input" top: "data" include { phase: TEST }
  input_param { shape { dim: 1 dim: 3 dim: 9 dim: 7 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 6 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "gap" type: "Pooling" bottom: "conv1" top: "gap" pooling_param { pool: AVE global_pooling: true } }
layer { name: "gmp" type: "Pooling" bottom: "conv1" top: "gmp" pooling_param { pool: MAX global_pooling: true } }
layer { name: "cat" type: "Concat" bottom: "gap" bottom: "gmp" top: "cat" concat_param { axis: 1 } }
layer { name: "ip" type: "InnerProduct" bottom: "cat" top: "ip" inner_product_param { num_output: 4 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" top: "loss" include { phase: TRAIN } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
""",
    "flatten_axes": 'name: "flatten_axes"\ninput: "image"\ninput_shape { dim: 1 dim: 2 dim: 5 dim: 6 }\n' + """
layer { name: "conv1" type: "Convolution" bottom: "image" top: "conv1"
  convolution_param { num_output: 3 kernel_size: 2 } }
layer { name: "flat12" type: "Flatten" bottom: "conv1" top: "flat12" flatten_param { axis: 1 end_axis: 2 } }
layer { name: "ip_t" type: "InnerProduct" bottom: "flat12" top: "ip_t"
  inner_product_param { num_output: 4 transpose: true } }
layer { name: "prob" type: "Softmax" bottom: "ip_t" top: "prob" softmax_param { axis: -1 } }
""",
    "v1_legacy": """
name: "v1_legacy"
input: "data"
input_dim: 1
input_dim: 3
input_dim: 10
input_dim: 10
layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
  blobs_lr: 1 blobs_lr: 2 convolution_param { num_output: 4 kernel_size: 3 } }
layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }
layers { name: "norm1" type: LRN bottom: "conv1" top: "norm1" lrn_param { local_size: 3 alpha: 0.1 beta: 0.75 } }
layers { name: "pool1" type: POOLING bottom: "norm1" top: "pool1" pooling_param { pool: AVE kernel_size: 3 stride: 2 } }
layers { name: "split" type: SPLIT bottom: "pool1" top: "p1" top: "p2" }
layers { name: "sum" type: ELTWISE bottom: "p1" bottom: "p2" top: "sum" }
layers { name: "cat" type: CONCAT bottom: "sum" bottom: "p1" top: "cat" concat_param { concat_dim: 1 } }
layers { name: "flat" type: FLATTEN bottom: "cat" top: "flat" }
layers { name: "ip1" type: INNER_PRODUCT bottom: "flat" top: "ip1" inner_product_param { num_output: 5 } }
layers { name: "drop1" type: DROPOUT bottom: "ip1" top: "ip1" dropout_param { dropout_ratio: 0.5 } }
layers { name: "prob" type: SOFTMAX bottom: "ip1" top: "prob" }
""",
}

# A net for Deep Compression files: 8-bit conv layers, 4-bit fc/ip layers, a ReLU named *conv*.
DEEP_COMPRESSION_TINY = 'name: "dc_tiny"\n' + _input_layer(3, 12, 12) + """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 16 kernel_size: 3 stride: 2 } }
layer { name: "relu_conv1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fire/conv3x3" type: "Convolution" bottom: "pool1" top: "fire/conv3x3"
  convolution_param { num_output: 24 kernel_size: 3 pad: 1 } }
layer { name: "relu_fire" type: "ReLU" bottom: "fire/conv3x3" top: "fire/conv3x3" }
layer { name: "fc6" type: "InnerProduct" bottom: "fire/conv3x3" top: "fc6" inner_product_param { num_output: 20 } }
layer { name: "ip7" type: "InnerProduct" bottom: "fc6" top: "ip7" inner_product_param { num_output: 10 } }
layer { name: "prob" type: "Softmax" bottom: "ip7" top: "prob" }
"""


TINY_FIRE_PROTOTXT = 'name: "tiny_fire"\n' + _input_layer(3, 17, 17) + """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 stride: 2 } }
layer { name: "relu_conv1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "fire2/squeeze1x1" type: "Convolution" bottom: "pool1" top: "fire2/squeeze1x1"
  convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "fire2/relu_squeeze1x1" type: "ReLU" bottom: "fire2/squeeze1x1" top: "fire2/squeeze1x1" }
layer { name: "fire2/expand1x1" type: "Convolution" bottom: "fire2/squeeze1x1" top: "fire2/expand1x1"
  convolution_param { num_output: 6 kernel_size: 1 } }
layer { name: "fire2/relu_expand1x1" type: "ReLU" bottom: "fire2/expand1x1" top: "fire2/expand1x1" }
layer { name: "fire2/expand3x3" type: "Convolution" bottom: "fire2/squeeze1x1" top: "fire2/expand3x3"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "fire2/relu_expand3x3" type: "ReLU" bottom: "fire2/expand3x3" top: "fire2/expand3x3" }
layer { name: "fire2/concat" type: "Concat" bottom: "fire2/expand1x1" bottom: "fire2/expand3x3" top: "fire2/concat" }
layer { name: "conv10" type: "Convolution" bottom: "fire2/concat" top: "conv10"
  convolution_param { num_output: 5 kernel_size: 1 } }
layer { name: "relu_conv10" type: "ReLU" bottom: "conv10" top: "conv10" }
layer { name: "pool10" type: "Pooling" bottom: "conv10" top: "pool10" pooling_param { pool: AVE global_pooling: true } }
layer { name: "prob" type: "Softmax" bottom: "pool10" top: "prob" }
"""
