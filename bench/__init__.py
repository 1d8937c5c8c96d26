"""The benchmarks behind BENCHMARKS.md, each script named by the question it answers.

Run from the repository root: `python -m bench.<script> --help`. What scripts share lives in
bench.harness (running a command, simulating a pair into a store, the standard error of a
balanced accuracy, result files, the shared command line); a script's figures go to
bench/results/<script>*.json.

The model and its defaults
  model_vs_plain_recipe      does the model beat the strongest plain recipe on varied pairs?
  training_defaults          how were the training defaults chosen, and what do they give?
  encoder_divergence_table   every encoder x divergence with the defaults, beside the baselines
  sim_difficulty             how hard is the simulated task for plain baselines?
  peak_mapper_methods        does the neural peak mapper beat the coordinate mapper and joint LSI?
Sweeps: what they should rank by, run and return
  selection_objective        which label-free objective picks the configuration that transfers?
  sweep_objective_eval       does a sweep ranked by that objective find a better model?
  sweep_final_ensemble       should a sweep return its best trial or its top K averaged?
  sweep_retrain_best         should it return its best configuration retrained as the defaults train?
  sweep_design_study         which sweep design returns a model above the defaults (populations)?
  sweep_design_replay        ... the designs replayed on those populations, and the rule's pick
  sweep_design_eval          ... the pick on fresh pairs
  asha_savings               what does ASHA save?
  asha_after_warmup          should ASHA judge a trial before its warm-up ends?
  per_class_se               the stored sweep results' standard errors, per class
What things cost
  store_vs_csv               the cell store against parsing CSV
  peak_mapper_speed          the coordinate peak mapper on 100k-peak sets
  orchestration_cost         Ray Tune sweeps against their trials' compute and a plain Optuna loop
  sweep_overhead             where a sweep's orchestration overhead goes
  checkpoint_cost            what a trial's checkpoints cost
  ray_report_costs           what Ray's per-report costs take from short epochs
  population_trainer_speed   a population of P members against P separate trials, per epoch
  population_sweep_speedup   a sweep of populations against one configuration per trial
  cluster_costs              cluster-wide sweeps: store reads, trial start-up, a node lost
On the GPU machine (bench/gpu_run.sh, bench/gpu_sweep.sh)
  gpu_epoch_time             one training epoch on research-sized data, against plain PyTorch
  embedding_throughput       Geneformer-shaped cell embedding throughput
  gpu_sweep                  `xfer tune` on one GPU: orchestration cost, trials per GPU
  pack_deps                  packs Ray, Optuna and the rest for that machine
"""
