"""Command-line options of the pytest-benchmark microbenchmarks in bench/."""


def pytest_addoption(parser):
    parser.addoption("--page-size", type=int, default=0, metavar="PS",
                     help="bench_decode_attention: also time the op on a paged cache of PS-token pages "
                          "(providers torch-paged, triton-paged) next to the slot form; 0 (default): slot form only")
