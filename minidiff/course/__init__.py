"""What the lessons use and the library never depends on: the shapes data set and its checker, the exact
Gaussian model, evaluation, training, the notebook helpers and the milestones.

    shapes      the 64 px pictures of one coloured shape, their captions, and the checker that reads them back
    gaussian    data from N(mu, s^2 I): the ideal denoiser and the ODE's exact solution, for convergence orders
    evaluate    held-out adherence and the sampler table on a shapes model
    train       `python -m minidiff.course.train shapes`: the bundled model, trained from scratch
    viz         pictures for the notebooks: traces, grids, a tiny pipeline
    milestones  the checks a student runs against their own code
    commands    the course's subcommands of `minidiff` (milestones, sampler-table)
"""
