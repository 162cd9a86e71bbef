"""zeromix head side: job spec -> plan -> reserve -> launch -> report."""
