"""Models and files the tests build themselves, so that the suite runs without the mirror of real
files; one module per thing built:

- :mod:`.prototxts`: Caffe prototxt texts (tiny nets exercising every supported layer type, the
  real architectures AlexNet, VGG-16 and OverFeat "fast");
- :mod:`.caffe`: the structure of a Caffe net (blob and parameter shapes) and random-weight
  caffemodel / mean.binaryproto writers;
- :mod:`.deep_compression`: a Deep Compression ``.net`` encoder;
- :mod:`.openvino`: a small OpenVINO IR writer;
- :mod:`.reference`: a float64 numpy reference of Caffe's forward pass;
- :mod:`.mirror_data`: the labelled images of the mirror, read for the real-data tests.
"""
