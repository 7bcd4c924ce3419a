import MicroVM
