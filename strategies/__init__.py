"""The server side of each method (Message API): the round loop, its strategies, and the
collaborators a strategy is given. ``registry`` maps ``strategy.name`` to a strategy."""
