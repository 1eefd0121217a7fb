"""What benchmark.py is made of, besides its table and command line:

    measure.py   a run's seconds and peak memory, and the rows of a table timed in turns
    peers.py     diffusers' rows (--peers): the same weights in diffusers' classes, dense and with its cache hooks
    floor.py     the floor (--floor): our dense evaluation's matmuls and attention calls replayed alone
"""
