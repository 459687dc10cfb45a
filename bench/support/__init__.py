"""What the benchmarks and the tests share: the processes they start (the upstream and
modelgate), the HTTP image server, and small ONNX model builders. Nothing here imports
`tests`; an installed wheel carries it, so every benchmark runs from a wheel."""
