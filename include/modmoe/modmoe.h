// Everything public, in one include.
#pragma once

#include "modmoe/all_to_all.h"
#include "modmoe/dtype.h"
#include "modmoe/error.h"
#include "modmoe/experts.h"
#include "modmoe/moe.h"
#include "modmoe/quant.h"
#include "modmoe/routing.h"
#include "modmoe/tensor.h"
#include "modmoe/version.h"
