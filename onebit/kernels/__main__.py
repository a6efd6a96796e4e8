"""``python -m onebit.kernels``: build the C++ kernels now and say which path is in use."""

from onebit.kernels import status

if __name__ == "__main__":
    print(status())
